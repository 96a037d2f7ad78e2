// cvchain on Azure Functions Flex Consumption, with identity-based connections only.
//
//   az deployment group create -g <rg> -f deploy/main.bicep \
//     -p customVisionAccountName=<cv-training-resource> customVisionPrincipalId=<its identity>
//
// Creates: a storage account (the notification queue and its poison queue, the backup container
// Custom Vision exports into, the release container, the history table, the deployment-package
// container), a Log Analytics workspace with Application Insights, a Flex Consumption plan and a
// function app on runtime `custom` with a system-assigned identity, and the role assignments that
// identity and Custom Vision's own identity need. No key or connection string is stored anywhere:
// the storage account refuses shared keys, and every app setting is an endpoint or a name.
// README "Deploy" walks through it, from zero to the first ConnectionTest row.

targetScope = 'resourceGroup'

@description('Prefix of every resource name (lowercase letters and digits).')
@minLength(3)
@maxLength(11)
param name string = 'cvchain'

@description('Region of every resource; one where Flex Consumption is offered.')
param location string = resourceGroup().location

@description('The Custom Vision training resource (its name), in resourceGroup customVisionResourceGroup. Empty: cvchain only records notifications (no enrichment, no export chain).')
param customVisionAccountName string = ''

@description('The resource group of the Custom Vision training resource.')
param customVisionResourceGroup string = resourceGroup().name

@description('Principal id of the Custom Vision training resource\'s system-assigned identity (az cognitiveservices account identity show). Custom Vision writes the notifications and the model backups with it. Empty: assign its roles yourself.')
param customVisionPrincipalId string = ''

@description('CVCHAIN_EXPORTS: the export chain, in order, e.g. "ONNX, TensorFlow:TensorFlowLite, DockerFile:Linux".')
param exports string = 'ONNX'

@description('The notification queue (CVCHAIN_QUEUE); Custom Vision\'s notificationQueueUri points at it.')
param queueName string = 'customvision-notifications'

@description('The container Custom Vision backs exported models up to (its exportModelContainerUri).')
param backupContainerName string = 'cvbackups'

@description('The container the release copies go to (CVCHAIN_RELEASE_CONTAINER).')
param releaseContainerName string = 'models'

@description('The history table (CVCHAIN_HISTORY_TABLE).')
param historyTableName string = 'CustomVisionHistory'

@secure()
@description('CVCHAIN_CONSOLE_SECRET: what the console\'s forms are signed with, the same on every instance. A new random value with each deployment unless you give one (a page opened before a deployment then asks for a reload before its form is posted).')
param consoleSecret string = newGuid() // checkov:skip=CKV_AZURE_131:The default is newGuid(), a new random value each deployment, not a fixed secret.

@description('Most instances the app scales out to. Flex Consumption accepts 40 to 1000; below 40 only in the regions where lower counts are in preview, and there 4 to 8 is enough: the Custom Vision resource serves 10 calls a second for all instances together (about 4 notifications a second), and fewer instances sharing it means fewer refused calls. The instances find their shares of those 10 calls themselves, however many run.')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Calls a second the Custom Vision resource serves (10 on S0 and F0): each instance\'s ceiling (CVCHAIN_CV_MAX_RPS). An instance alone goes up to it; several slow down on the service\'s 429 answers until together they fit.')
@minValue(1)
@maxValue(1000)
param customVisionCallsPerSecond int = 10

@description('Memory of each instance; cvchain itself needs a few MiB, the Functions host the rest.')
@allowed([512, 2048, 4096])
param instanceMemoryMB int = 2048

@description('Spread the plan\'s instances over availability zones (only in regions where Flex Consumption offers it).')
param zoneRedundant bool = false

@description('Storage redundancy. Standard_ZRS or Standard_GZRS where the region has zones.')
@allowed(['Standard_LRS', 'Standard_ZRS', 'Standard_GRS', 'Standard_GZRS'])
param storageSku string = 'Standard_LRS'

var token = toLower(uniqueString(resourceGroup().id, name))
var storageName = take(toLower('${name}${token}'), 24)
var appName = '${name}-${token}'
var deploymentContainerName = 'app-package'
var poisonQueueName = '${queueName}-poison'
var withCustomVision = !empty(customVisionAccountName)

// Built-in role ids (https://learn.microsoft.com/azure/role-based-access-control/built-in-roles).
var roles = {
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  storageBlobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
  storageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
}

// ---------------------------------------------------------------------------------------------
// Storage: everything cvchain and the Functions host keep, reached with Microsoft Entra ID only.

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: storageName
  location: location
  kind: 'StorageV2'
  sku: {
    name: storageSku
  }
  properties: {
    // checkov:skip=CKV_AZURE_35:Custom Vision writes notifications and backups from the service's own network over the public endpoint, and Flex Consumption without a virtual network reaches storage the same way; shared keys are off, so every request needs an Entra ID token and a role.
    // checkov:skip=CKV_AZURE_59:Same reason as CKV_AZURE_35: Custom Vision needs the public endpoint; access is by role only.
    // checkov:skip=CKV_AZURE_43:The name is computed (prefix + uniqueString, lowercased, cut to 24 characters), which the check cannot evaluate; it follows the naming rules.
    // checkov:skip=CKV_AZURE_206:Replication is the storageSku parameter; LRS is the cheap default for a queue, a table and copies of models that Custom Vision can export again.
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    allowBlobPublicAccess: false
    // cvchain, the Functions host, the deployment and Custom Vision all use Entra ID.
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    allowCrossTenantReplication: false
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
    encryption: {
      keySource: 'Microsoft.Storage'
      requireInfrastructureEncryption: true
      services: {
        blob: { enabled: true, keyType: 'Account' }
        file: { enabled: true, keyType: 'Account' }
        queue: { enabled: true, keyType: 'Account' }
        table: { enabled: true, keyType: 'Account' }
      }
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 7
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource backupContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: backupContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource releaseContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: releaseContainerName
  properties: {
    publicAccess: 'None'
  }
}

// Flex Consumption runs the app from the package it finds here.
resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource queue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: queueName
}

// The host moves a message here after host.json's maxDequeueCount; cvchain copies rejected ones.
resource poisonQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: poisonQueueName
}

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource historyTable 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = {
  parent: tableService
  name: historyTableName
}

// ---------------------------------------------------------------------------------------------
// Monitoring: the host's logs and cvchain's stdout/stderr lines, sent with Entra ID.

resource logs 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: '${name}-logs-${token}'
  location: location
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: 30
  }
}

resource insights 'Microsoft.Insights/components@2020-02-02' = {
  name: '${name}-insights-${token}'
  location: location
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: logs.id
    // Telemetry only with an Entra ID token (APPLICATIONINSIGHTS_AUTHENTICATION_STRING below).
    DisableLocalAuth: true
  }
}

resource customVisionAccount 'Microsoft.CognitiveServices/accounts@2024-10-01' existing = if (withCustomVision) {
  name: customVisionAccountName
  scope: resourceGroup(customVisionResourceGroup)
}

// ---------------------------------------------------------------------------------------------
// The function app: Flex Consumption, runtime `custom`, the package from dist/app.zip.

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  // checkov:skip=CKV_AZURE_225:Zone redundancy is the zoneRedundant parameter: Flex Consumption offers it only in some regions, so it cannot be on by default.
  name: '${name}-plan-${token}'
  location: location
  kind: 'functionapp'
  sku: {
    tier: 'FlexConsumption'
    name: 'FC1'
  }
  properties: {
    reserved: true
    zoneRedundant: zoneRedundant
  }
}

var customVisionSettings = withCustomVision ? [
  {
    // The custom-subdomain endpoint, which Entra ID tokens need.
    name: 'CUSTOM_VISION_ENDPOINT'
    value: customVisionAccount.properties.endpoint
  }
  {
    // The app's own identity, with the Custom Vision Trainer role below: no training key.
    name: 'CUSTOM_VISION_CREDENTIAL'
    value: 'managedidentity'
  }
] : []

// Every instance limits its own Custom Vision calls, and the service allows 10 a second per
// resource for all of them together: each instance gets its share (at least 1).

var appSettings = [
  // The host's own storage (leases, keys, the queue trigger's scale data).
  {
    name: 'AzureWebJobsStorage__accountName'
    value: storage.name
  }
  {
    name: 'AzureWebJobsStorage__credential'
    value: 'managedidentity'
  }
  // cvchain's storage and the queue trigger's connection (function.json: CVCHAIN_STORAGE).
  {
    name: 'CVCHAIN_STORAGE__blobServiceUri'
    value: storage.properties.primaryEndpoints.blob
  }
  {
    name: 'CVCHAIN_STORAGE__queueServiceUri'
    value: storage.properties.primaryEndpoints.queue
  }
  {
    name: 'CVCHAIN_STORAGE__tableServiceUri'
    value: storage.properties.primaryEndpoints.table
  }
  {
    name: 'CVCHAIN_STORAGE__credential'
    value: 'managedidentity'
  }
  {
    name: 'CVCHAIN_QUEUE'
    value: queueName
  }
  {
    name: 'CVCHAIN_HISTORY_TABLE'
    value: historyTableName
  }
  {
    name: 'CVCHAIN_BACKUP_CONTAINER'
    value: '${storage.properties.primaryEndpoints.blob}${backupContainerName}'
  }
  {
    name: 'CVCHAIN_RELEASE_CONTAINER'
    value: releaseContainerName
  }
  {
    name: 'CVCHAIN_EXPORTS'
    value: exports
  }
  {
    name: 'CVCHAIN_CV_MAX_RPS'
    value: string(customVisionCallsPerSecond)
  }
  {
    // The console's forms carry tokens signed with it: every instance must have the same.
    name: 'CVCHAIN_CONSOLE_SECRET'
    value: consoleSecret
  }
  {
    name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
    value: insights.properties.ConnectionString
  }
  {
    name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING'
    value: 'Authorization=AAD'
  }
]

resource app 'Microsoft.Web/sites@2024-04-01' = {
  name: appName
  location: location
  kind: 'functionapp,linux'
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    // checkov:skip=CKV_AZURE_222:The History page (an HTTP function, authLevel function) and zip deployment need the public endpoint; the queue trigger takes no inbound traffic.
    // checkov:skip=CKV_AZURE_17:The History page is opened in a browser with a function key; browsers present no client certificate.
    // checkov:skip=CKV_AZURE_213:Flex Consumption has no App Service health check; the host itself polls the handler's GET / and restarts it when it stops answering.
    // checkov:skip=CKV_AZURE_212:Flex Consumption scales out by itself (maximumInstanceCount); there is no plan instance count to set.
    serverFarmId: plan.id
    httpsOnly: true
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
      appSettings: concat(appSettings, customVisionSettings)
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'SystemAssignedIdentity'
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      // Flex Consumption takes the runtime here; FUNCTIONS_WORKER_RUNTIME is not an app setting.
      runtime: {
        name: 'custom'
        version: '1.0'
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Roles of the app's identity, on its own storage account: queue (trigger, poison copies,
// `cvchain replay`), blobs (release copies and their index tags, which need Data Owner; the host's
// leases; the deployment package), table (history).

var appStorageRoles = [
  roles.storageQueueDataContributor
  roles.storageBlobDataOwner
  roles.storageTableDataContributor
]

resource appStorageRoleAssignments 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for role in appStorageRoles: {
    name: guid(storage.id, app.id, role)
    scope: storage
    properties: {
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', role)
      principalId: app.identity.principalId
      principalType: 'ServicePrincipal'
    }
  }
]

resource appInsightsRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(insights.id, app.id, roles.monitoringMetricsPublisher)
  scope: insights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.monitoringMetricsPublisher)
    principalId: app.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

// Custom Vision's own identity writes the notifications and the backups (the service's storage
// integration needs exactly these two roles). Each is scoped to the one queue or container it
// writes, not to the account, so Custom Vision can read nothing else cvchain keeps.

resource customVisionQueueRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(customVisionPrincipalId)) {
  name: guid(queue.id, customVisionPrincipalId, roles.storageQueueDataContributor)
  scope: queue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageQueueDataContributor)
    principalId: customVisionPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource customVisionBackupRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(customVisionPrincipalId)) {
  name: guid(backupContainer.id, customVisionPrincipalId, roles.storageBlobDataContributor)
  scope: backupContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
    principalId: customVisionPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// The app's identity on the Custom Vision training resource (possibly in another resource group).
module customVision 'modules/custom-vision-role.bicep' = if (withCustomVision) {
  name: 'cvchain-custom-vision-role'
  scope: resourceGroup(customVisionResourceGroup)
  params: {
    accountName: customVisionAccountName
    principalId: app.identity.principalId
  }
}

output functionAppName string = app.name
output storageAccountName string = storage.name
output principalId string = app.identity.principalId
@description('notificationQueueUri for Custom Vision\'s UpdateProject or CreateProject.')
output notificationQueueUri string = '${storage.properties.primaryEndpoints.queue}${queueName}'
@description('exportModelContainerUri for Custom Vision\'s UpdateProject or CreateProject.')
output exportModelContainerUri string = '${storage.properties.primaryEndpoints.blob}${backupContainerName}'
