// The function app's identity on the Custom Vision training resource: Cognitive Services Custom
// Vision Trainer, the least role that reads projects, iterations and performance and exports and
// publishes iterations (cvchain never creates or deletes projects). A module because the training
// resource may live in another resource group.

@description('The Custom Vision training resource in this resource group.')
param accountName string

@description('The function app\'s system-assigned identity.')
param principalId string

var customVisionTrainer = '0a5ae4ab-0d65-4eeb-be61-29fc9b54394b'

resource account 'Microsoft.CognitiveServices/accounts@2024-10-01' existing = {
  name: accountName
}

resource trainer 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(account.id, principalId, customVisionTrainer)
  scope: account
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', customVisionTrainer)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}
